"""XX: run serverless functions by price class; the class decides placement, CPU and memory."""

__version__ = "0.1.0"
