"""Example models built from rnnfast's layers: a character-level language model and a digits
classifier. Each runs from the command line (``python -m rnnfast charlm|digits``)."""
