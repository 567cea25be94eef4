# tokenizer rules (being written)
