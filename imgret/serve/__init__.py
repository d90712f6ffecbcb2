"""The web demo: `python -m imgret.serve` (see __main__), the application in `app`, the page in page.html."""
