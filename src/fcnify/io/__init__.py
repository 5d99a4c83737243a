"""Files a user hands fcnify or gets back: images, preprocessing, labels, model cards, outputs, downloads."""
