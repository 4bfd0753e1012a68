"""FID/KID and the paper's comparisons (Tables 1/3, Fig. 7, Fig. 4) plus the HTML report."""
