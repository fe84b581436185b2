# The burst's start latency vs concurrent starts (tests/e2e/burst.sh, several sizes):
#   gnuplot -e "csv='burst-starts.csv'; png='burst-starts.png'" burst.gnuplot
# Columns: concurrent starts; the daemon's StartContainer handling p50, p99, max (ms);
# crictl start p50, p99, max (ms); the daemon's CPU per container (ms).
set terminal pngcairo noenhanced size 900,500 font ",10"
set output png
set datafile separator ","
set key top left
set grid
set title "nri-identity-injector on containerd + SPIRE (PID mode): start latency vs concurrent starts"
set xlabel "containers started at once"
set ylabel "ms (log scale)"
set logscale y
set yrange [1:*]
plot csv using 1:2 skip 1 with linespoints lw 2 title "daemon: StartContainer handling p50", \
     '' using 1:3 skip 1 with linespoints lw 2 title "daemon: StartContainer handling p99", \
     '' using 1:5 skip 1 with linespoints dt 2 title "crictl start p50 (runc, NRI, daemon)", \
     '' using 1:6 skip 1 with linespoints dt 2 title "crictl start p99"
