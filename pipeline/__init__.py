"""The MLOps layer: params schemas, run context, MLflow tracking, outputs and the stage entry point."""
