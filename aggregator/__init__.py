"""The aggregator: settles, forms hash-chained blocks that consensus agents sign, reports."""
