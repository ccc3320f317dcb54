//! Host side of Carapace: guest assets, sandbox VMs, the agent client.
