"""Harnesses the lanes share: a throwaway xxnode, cluster processes, the network lab."""
