"""Units. Inside meshplan everything is SI (seconds, bytes, FLOP, FLOP/s, bytes/s); these
constants convert at the edges, where figures are read from sources or printed."""
KIB, MIB, GIB = 2 ** 10, 2 ** 20, 2 ** 30
TB = 1e12                     # decimal, as datasheets give bandwidths
TFLOPS = 1e12                 # FLOP/s


def rate_text(value: float) -> str:
    """A rate (tokens/s) for people: grouped thousands from 100 up, three significant digits
    below, so that a CPU's 0.39 tokens/s does not print as 0."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
