"""LangChain's OpenAI integrations, pointed at the gateway's ``/v1`` unchanged."""

from __future__ import annotations

import requests
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import SecretStr
from test_gateway_support import gateway_url_fixture  # noqa: F401

EMBEDDER = "all-minilm"  # an embedding model the session's worker serves


def test_chat_openai(gateway_url: str) -> None:
    chat = ChatOpenAI(
        model="llama3.2", base_url=f"{gateway_url}/v1", api_key=SecretStr("unused"), max_retries=0
    )
    reply = chat.invoke("Recommend a novel.")
    assert isinstance(reply.content, str) and reply.content.strip()
    assert reply.usage_metadata and reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(str(chunk.content) for chunk in chat.stream("Recommend a novel."))
    assert streamed.strip()


def test_openai_embeddings(gateway_url: str, sim_url: str) -> None:
    # A server that is not OpenAI gets texts, not tiktoken's token arrays: LangChain's own
    # setting for compatible servers.
    embedder = OpenAIEmbeddings(
        model=EMBEDDER,
        base_url=f"{gateway_url}/v1",
        api_key=SecretStr("unused"),
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    texts = ["a red fox", "a lazy dog"]
    documents = embedder.embed_documents(texts)
    query = embedder.embed_query("a red fox")
    body = {"model": EMBEDDER, "input": texts}
    direct = requests.post(f"{sim_url}/api/embed", json=body, timeout=30).json()["embeddings"]
    assert len(documents) == 2 and len(documents[0]) == len(direct[0])
    for got, want in zip([*documents, query], [*direct, direct[0]], strict=True):
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 1e-6
