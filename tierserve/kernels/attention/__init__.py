"""Paged attention backends: the contract (``base``), the triton kernels, the name registry.

The torch reference lives in ``tierserve/kernels/paged_attention.py``; this
package holds what is swapped against it. Importing the package imports
nothing else (modules are imported by name).
"""
