"""The paper's tables and figures, written from MLflow runs (``evl-platform report``)."""
