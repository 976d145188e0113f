"""Data: dataset parsers (`datasets`), image checks, tf.data input and augmentation, the TFDS builder."""

# `config.data.source`: where the encoded images are read from, the dataset's files under `config.data.root`
# or the TFRecords the TFDS builder (`data_pipelines.tfds`) prepared. Here so that checking a config needs
# no TensorFlow import.
SOURCES = ("files", "tfds")
