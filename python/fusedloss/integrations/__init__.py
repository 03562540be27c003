"""Integrations of fusedloss with other libraries.

Each integration is a submodule that the user imports explicitly, e.g.
`import fusedloss.integrations.transformers`; importing `fusedloss` or this package imports
none of them (nor the libraries they integrate with).
"""
