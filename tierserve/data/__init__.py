"""Real text corpora for calibration and perplexity (Jane Austen via r-cran-janeaustenr)."""
