"""On disk and on screen: persistence, export, the HTML report, plots."""
