"""Units. Inside meshplan everything is SI (seconds, bytes, FLOP, FLOP/s, bytes/s); these
constants convert at the edges, where figures are read from sources or printed."""
KIB, MIB, GIB = 2 ** 10, 2 ** 20, 2 ** 30
TB = 1e12                     # decimal, as datasheets give bandwidths
TFLOPS = 1e12                 # FLOP/s
