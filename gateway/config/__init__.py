"""Configuration: the YAML file and its front-end profiles loaded and checked (FILE:LINE errors), and
what it compiles to for the pipeline: zones, the policy, the DLP rules (the Runtime)."""
