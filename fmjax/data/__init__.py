"""Data: toy targets with exact flow maps, the dataset names (fmjax.data.datasets: TFDS sets,
folders, arrays registered in memory), and the pipelines that turn them into batches."""
