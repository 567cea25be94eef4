# download rules (being written)
