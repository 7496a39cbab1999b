"""The store layer: every SQL statement Harmonia runs outside migrations/ lives in this package."""
