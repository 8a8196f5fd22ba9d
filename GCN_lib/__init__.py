"""Rs_GCN.py: the paper's region relationship reasoning block (a graph convolution over the regions)."""
