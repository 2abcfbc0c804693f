"""Model-free evaluation harness; import the module for the job.

- ``datasets``: HotpotQA / SQuAD v2 / needle-in-a-haystack examples as passage lists
- ``metrics``: answer normalisation, exact match, token F1
- ``stats``: bootstrap confidence intervals and paired comparisons
- ``methods``: a method is a name plus ``QueryOptions``, written ``infoflow+reorder@0.15``, ``infoflow@0.15+infokv:0.5``
- ``runner``: resumable evaluation of methods against an engine
- ``results``: the append-only results file
- ``tables``, ``plots``: the report's Markdown tables and PNG plots
- ``report``: the generated Markdown report of a results file
- ``suite``: the published comparison as one resumable command
- ``fidelity``: teacher-forced fidelity to full prefill
"""
