"""After the run: the report's numbers (data), its page (html) and plots."""
