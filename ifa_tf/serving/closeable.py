"""`Closeable`: a base whose `with` block closes it (clients, state stores)."""


class Closeable:
    def close(self):
        """Releases what the object holds (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
