"""Dense classification maps: run a fully convolutional net over images, in tiles, locally or on Dask."""
