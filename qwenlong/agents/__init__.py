"""Agents that run the policy in several calls (QwenLong-L1.5's memory agent for documents past the window)."""

from qwenlong.agents.memory import (
    AgentQuery,
    AgentStep,
    MemoryAgent,
    MemoryAgentConfig,
    Trajectory,
    chunk_document,
    chunk_ids,
    memory_agent_generate_fn,
    parse_memory_step,
    query_from_prompt,
    query_from_record,
    score_trajectories,
    split_query,
    trajectory_sequences,
)

__all__ = ["AgentQuery", "AgentStep", "MemoryAgent", "MemoryAgentConfig", "Trajectory", "chunk_document",
           "chunk_ids", "memory_agent_generate_fn", "parse_memory_step", "query_from_prompt", "query_from_record",
           "score_trajectories", "split_query", "trajectory_sequences"]
