"""Analysis of the discrete codes of an IMSVD model (paper Sec. III-E, V-C, Figs. 3-5)."""
