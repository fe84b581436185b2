# The kubelet benchmark's plot (benches/daemon/main.rs, `kubelet`):
#   gnuplot -e "csv='kubelet-pod-list.csv'; png='kubelet-pod-list.png'" kubelet.gnuplot
# Columns: pods on the node, bytes of the list, p50, p99 and mean time of one list (µs).
set terminal pngcairo noenhanced size 900,500 font ",10"
set output png
set datafile separator ","
set key top left
set grid
set title "nri-identity-injector: one kubelet pod list (fetch and parse) vs pods on the node"
set xlabel "pods on the node (realistic pod objects)"
set ylabel "ms per list"
set yrange [0:*]
set y2label "KiB per list"
set y2range [0:*]
set y2tics
set ytics nomirror
plot csv using 1:($3/1000) skip 1 with linespoints lw 2 title "p50", \
     '' using 1:($4/1000) skip 1 with linespoints title "p99", \
     '' using 1:($2/1024) skip 1 axes x1y2 with lines dt 2 title "list size (right axis)"
