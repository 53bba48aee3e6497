"""From a trial's checkpoint to files that run without segtune, and back to masks: the export
folder's contract (`bundle`), conversion and checks (`convert`), the model card (`card`), the
MLflow Model Registry (`registry`), and running an export (`runtime`)."""
