//! The agent API shared by the runtime (client) and the agent (server).
