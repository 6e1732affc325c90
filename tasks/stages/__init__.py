"""One module per stage kind: its typed config and its declaration (`STAGE`), torch-free."""
