"""The site side: the Flower ClientApp and the site's own state."""
