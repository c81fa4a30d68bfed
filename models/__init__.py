"""Training and evaluation: the split protocol and its metrics, ALS, retrieval and the FAISS
indexes, the TensorFlow ranker, and the hand-off to MLflow and the BentoML model store."""
