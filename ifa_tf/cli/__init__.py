"""Console scripts: thin absl `main`s over library functions that the tests call directly."""
