"""`alignkit label`: a local page where people rank, rate and write answers, over a SQLite file beside the batch.

batch.py reads what `alignkit sample` wrote; store.py keeps every action; export.py turns actions into the stages'
formats (and is what the rounds read); server.py is the web app; main.py the command. None of them trains."""
