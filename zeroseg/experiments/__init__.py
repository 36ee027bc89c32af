"""What combines rooms: ablations, the demo, and its offline data (synthetic scenes, the toy teacher)."""
