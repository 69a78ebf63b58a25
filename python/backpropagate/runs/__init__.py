"""Run history: every train, export and eval run, findable in one SQLite database (`backprop runs`)."""
