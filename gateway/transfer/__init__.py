"""A transfer, as the pipeline sees it: its model (decisions, reasons, the trace record's fields), what
the proxy edge tells the pipeline (gateway.transfer.edge), and the spool its long bodies pass through."""
