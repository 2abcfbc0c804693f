"""A stock LlamaIndex query engine over HotpotQA paragraphs, answered with infoflow-rag KV reuse. Offline.

    .venv/bin/python examples/llamaindex_query_engine.py [--model smollm2-135m] [--questions 3]

(On a busy 2-core machine, OMP_NUM_THREADS=1 in front is often several times faster.)

The paragraphs of a few HotpotQA questions go through an IngestionPipeline whose last step,
InfoFlowKVCacheTransform, prefills and stores each paragraph's KV; the nodes land in a FAISS vector
store. The query engine then hands InfoFlowLLM one prompt string per question, and the paragraphs
quoted in it are served from the stored KV with ~15 % of their tokens recomputed.
"""

from __future__ import annotations

import argparse

import faiss
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent
from llama_index.llms.infoflow import STATS_KEY, InfoFlowEmbedding, InfoFlowKVCacheTransform, InfoFlowLLM
from llama_index.vector_stores.faiss import FaissVectorStore

from infoflow_rag.corpus import hotpotqa, paragraph_text
from infoflow_rag.models import DEFAULT_MODEL
from infoflow_rag.pipeline import Pipeline


class LastStats(BaseEventHandler):
    """Keeps the infoflow stats of the latest completion (a query engine returns only the text)."""

    stats: dict = {}

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMCompletionEndEvent):
            self.stats = (event.response.raw or {}).get(STATS_KEY, {})


def documents(items: list[dict]) -> list[Document]:
    # The title is already the start of the text: keep it as metadata for display only.
    return [
        Document(
            text=paragraph_text(title, sentences),
            metadata={"title": title},
            excluded_llm_metadata_keys=["title"],
            excluded_embed_metadata_keys=["title"],
        )
        for item in items
        for title, sentences in item["context"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args()

    items = hotpotqa()[: args.questions]
    pipeline = Pipeline.from_model(args.model, store="memory")
    embed_model = InfoFlowEmbedding()
    nodes = IngestionPipeline(transformations=[embed_model, InfoFlowKVCacheTransform(pipeline)]).run(
        documents=documents(items), show_progress=True
    )
    vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(len(nodes[0].embedding)))
    index = VectorStoreIndex(
        nodes,
        storage_context=StorageContext.from_defaults(vector_store=vector_store),
        embed_model=embed_model,
    )
    query_engine = index.as_query_engine(
        llm=InfoFlowLLM(pipeline=pipeline, max_new_tokens=32), similarity_top_k=args.top_k
    )
    print(f"{len(nodes)} paragraphs ingested and prefilled; model {args.model}\n")

    handler = LastStats()
    get_dispatcher().add_event_handler(handler)
    for item in items:
        response = query_engine.query(item["question"])
        stats = handler.stats
        print(f"Q: {item['question']}\nA: {response.response}\n   (gold: {item['answer']})")
        print("   sources: " + "; ".join(f"{n.node.metadata['title']} ({n.score:.2f})" for n in response.source_nodes))
        print(
            f"   reuse: {stats['passages_hit']} passages from the KV store = {stats['reused_share']:.0%} of "
            f"{stats['prompt_tokens']} prompt tokens; {stats['recompute_fraction']:.0%} of passage tokens "
            f"recomputed; TTFT {stats['ttft']:.2f} s\n"
        )


if __name__ == "__main__":
    main()
