"""pixelcnn"""
