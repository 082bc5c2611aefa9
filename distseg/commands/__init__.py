"""One module per `distseg` command (or group of small data commands); distseg/cli.py loads them by name."""
