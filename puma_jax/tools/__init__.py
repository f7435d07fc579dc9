"""Command-line tools that plan or inspect training runs (no training themselves)."""
