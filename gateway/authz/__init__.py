"""Authorisation of data use (planned, issues 21 and 22): the data catalogue (open, conditional and
contract classes), grants co-signed by the authorities (政府授信), operators' licences, data-subject
consents (数据主体授权), quotas and usage for settlement. A library like gateway.dlp: the pipeline's
authorize stage calls it; it imports nothing of the proxy or the pipeline."""
