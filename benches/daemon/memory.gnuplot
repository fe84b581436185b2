# The memory benchmark's growth plot (benches/daemon/main.rs, `growth`):
#   gnuplot -e "csv='memory-growth.csv'; png='memory-growth.png'" memory.gnuplot
# Columns: live identities, the daemon's VmRSS and RssAnon (KiB), its open descriptors.
set terminal pngcairo noenhanced size 900,500 font ",10"
set output png
set datafile separator ","
set key top left
set grid
set title "nri-identity-injector (release, fake agent): resident memory vs live identities"
set xlabel "live identities (one SVID stream each)"
set ylabel "KiB"
set yrange [0:*]
set y2label "open descriptors"
set y2range [0:*]
set y2tics
set ytics nomirror
plot csv using 1:2 skip 1 with linespoints lw 2 title "VmRSS", \
     '' using 1:3 skip 1 with linespoints title "RssAnon", \
     '' using 1:4 skip 1 axes x1y2 with lines dt 2 title "descriptors (right axis)"
