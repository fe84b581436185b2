# The soak run's plot (tests/e2e/soak.sh): gnuplot -e "csv='plot.csv'; png='soak.png'".
# Columns of plot.csv (lib/chaos.py): minutes since the containers were up, the daemon's RSS
# (MiB), its descriptors, rotations per minute (the daemon's counter), the 1-minute load.
set terminal pngcairo noenhanced size 1000,900 font ",10"
set output png
set datafile separator ","
set key autotitle columnhead top left
set grid
set multiplot layout 3,1 title "nri-identity-injector soak: 500 identities, 60 s SVIDs, no faults"
set ylabel "daemon RSS (MiB)"
set yrange [0:*]
plot csv using 1:2 with lines lw 2 title "VmRSS", '' using 1:($3/100) with lines dt 2 title "open descriptors / 100"
set ylabel "rotations per minute"
plot csv using 1:4 with lines lw 2 title "files rewritten (nri_identity_rotations_total)"
set ylabel "load (2 cores)"
set xlabel "minutes"
plot csv using 1:5 with lines title "1-minute load average (the whole machine, shared)"
unset multiplot
