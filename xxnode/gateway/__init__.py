"""xxgate: the HTTP front door"""
