"""``dalle-data serve``: a collection over HTTP (dalle-service's API) and a page at /ui."""
