"""Training state below every trainer and backend: checkpoint folders (atomic writes, retention, reading
``model.pt`` back) and the optimizer and learning-rate schedule the stages build."""
