# metadata rules (being written)
