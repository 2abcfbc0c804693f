"""A LangChain RAG chain over HotpotQA paragraphs, answered with infoflow-rag KV reuse. Offline.

    .venv/bin/python examples/langchain_chain.py [--model smollm2-135m] [--questions 3]

(On a busy 2-core machine, OMP_NUM_THREADS=1 in front is often several times faster.)

The paragraphs of a few HotpotQA questions go into an infoflow-rag passage index (offline MiniLM
embeddings) and their KV is prefilled into an in-memory store. The chain retrieves with
InfoFlowRetriever and answers with the retrieved documents as separate cached passages, streaming:
documents first, then answer deltas, then the stats.
"""

from __future__ import annotations

import argparse
import tempfile

from langchain_infoflow import ChatInfoFlow, InfoFlowRetriever, create_infoflow_rag_chain

from infoflow_rag.corpus import hotpotqa, paragraph_text
from infoflow_rag.engine import Engine
from infoflow_rag.index.passage_index import PassageIndex
from infoflow_rag.models import DEFAULT_MODEL
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.store import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args()

    items = hotpotqa()[: args.questions]
    paragraphs = [(title, paragraph_text(title, sentences)) for item in items for title, sentences in item["context"]]
    with tempfile.TemporaryDirectory() as index_dir, PassageIndex.create(index_dir) as index:
        index.add_passages([text for _, text in paragraphs], sources=[f"hotpotqa:{title}" for title, _ in paragraphs])
        pipeline = Pipeline(Engine.load(args.model), open_store("memory"), index)
        pipeline.kv_for([text for _, text in paragraphs], progress=True)  # what `infoflow-rag ingest` stores
        print(f"{len(paragraphs)} paragraphs indexed and prefilled; model {args.model}\n")

        chain = create_infoflow_rag_chain(
            InfoFlowRetriever(index=index, k=args.top_k), ChatInfoFlow(pipeline=pipeline, max_tokens=32)
        )
        for item in items:
            print(f"Q: {item['question']}\nA: ", end="", flush=True)
            for chunk in chain.stream({"question": item["question"]}):
                if "documents" in chunk:
                    sources = "; ".join(
                        f"{d.metadata['source']} ({d.metadata['score']:.2f})" for d in chunk["documents"]
                    )
                if "answer" in chunk:
                    print(chunk["answer"], end="", flush=True)
                if "stats" in chunk:
                    stats = chunk["stats"]
            print(f"\n   (gold: {item['answer']})\n   sources: {sources}")
            print(
                f"   reuse: {stats['passages_hit']} passages from the KV store ({stats['context_tokens']} of "
                f"{stats['prompt_tokens']} prompt tokens); {stats['recompute_fraction']:.0%} of passage "
                f"tokens recomputed; TTFT {stats['ttft']:.2f} s\n"
            )


if __name__ == "__main__":
    main()
