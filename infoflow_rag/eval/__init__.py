"""Model-free evaluation harness; import the module for the job.

- ``datasets``: HotpotQA / SQuAD v2 / needle-in-a-haystack examples as passage lists
- ``metrics``: answer normalisation, exact match, token F1
- ``stats``: bootstrap confidence intervals and paired comparisons
- ``methods``: method specs and their string form (``infoflow+reorder@0.15``, ``infoflow@0.15+infokv:0.5``)
- ``runner``: resumable evaluation of methods against an engine
- ``results``: the append-only results file
- ``report``: tables, plots and the generated Markdown report
"""
